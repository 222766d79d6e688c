// /docs: start Swagger UI on the OpenAPI document the page names. A file rather than FastAPI's inline script,
// so the page runs under the receiver's Content-Security-Policy (script only from this origin).
"use strict";
window.ui = window.SwaggerUIBundle({
  url: document.getElementById("swagger-ui").dataset.openapiUrl,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [window.SwaggerUIBundle.presets.apis],
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // Swagger UI would otherwise send the document's URL to validator.swagger.io for a badge.
  validatorUrl: null,
});
