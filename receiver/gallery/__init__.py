"""Web gallery: server-rendered pages with a little vanilla JS for live updates and zooming.

Browsers authenticate with the same bearer tokens as the API, carried in an HttpOnly cookie set by
/login (the cookie is honoured for reads only). A device sees its own images, the admin sees all.
"""

from aeic.receiver.gallery.routes import install_gallery

__all__ = ["install_gallery"]
