"""Web gallery: server-rendered pages with a little vanilla JS for live updates and zooming.

Browsers sign in at /login with the same tokens as the API and get an HttpOnly session cookie
(`aeic.receiver.sessions`), honoured for reads only. A device sees its own images, the admin sees all.
"""

from aeic.receiver.gallery.routes import install_gallery

__all__ = ["install_gallery"]
