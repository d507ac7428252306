"""The web dashboard of ``stoker serve``, served under ``/ui`` by the service itself.

The page is plain HTML, CSS and JavaScript modules (no framework, no build
step) that read the public REST API, so it shows nothing the API would not
show to the same token.  Signing in puts the token in an HTTP-only,
SameSite=Strict cookie, which :class:`~stoker.service.apiutil.ScopeCheck`
accepts in place of a bearer header; see :mod:`stoker.service.ui.routes`.
"""

from stoker.service.ui.routes import router

__all__ = ["router"]
