"""The user code both systems serve in bench/run: the same classes, the
same answers. Imported by bench/serval_driver.py and bench/ray_driver.py.
"""

from starlette.responses import Response


class Noop:
    """No-op: "ok" over HTTP (a GET) and through a handle."""

    def __call__(self, request=None):
        return "ok"

    def other(self, x):
        return x


class Echo:
    """POST a JSON body, get the same bytes back as JSON."""

    async def __call__(self, request):
        body = await request.body()
        return Response(body, media_type="application/json")
