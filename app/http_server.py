"""The HTTP server's own answers, made before Flask sees a request: gunicorn's worker, with its parse errors (a request
line too long, CR, LF or NUL in a header, a malformed chunked body, ...) answered in the API's JSON envelope instead
of gunicorn's HTML page, and `Server: verdict` instead of `Server: gunicorn` (issue 17, item 5). `verdict api` and
`verdict dev` run it (app/cli.py); docs/security.md says what is left to a reverse proxy.
"""

from __future__ import annotations

import json
from ssl import SSLError
from typing import Any

import gunicorn.http.wsgi
from gunicorn import util
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import ThreadWorker

from app.api.errors import error_body

# What gunicorn sends as `Server` on every response it writes for the app (gunicorn has no setting for it).
SERVER_NAME = "verdict"

# Each parse error gunicorn raises, and the answer: status, reason phrase, code, message. The message is fixed:
# nothing of the request is echoed back, or logged (a malformed header may be an Authorization header).
_ANSWERS: tuple[tuple[tuple[type[BaseException], ...], tuple[int, str, str, str]], ...] = (
    ((http_errors.LimitRequestLine,),
     (414, "URI Too Long", "uri_too_long", "The request line is too long.")),
    ((http_errors.LimitRequestHeaders,),
     (431, "Request Header Fields Too Large", "request_headers_too_large",
      "Too many request headers, or a header too long.")),
    ((http_errors.InvalidHeader, http_errors.InvalidHeaderName, http_errors.ObsoleteFolding),
     (400, "Bad Request", "invalid_header",
      "A request header is malformed (a CR, LF or NUL in it, a name that is not a token, or a folded line).")),
    ((http_errors.InvalidRequestLine, http_errors.InvalidRequestMethod, http_errors.InvalidHTTPVersion),
     (400, "Bad Request", "invalid_request_line", "The request line is malformed.")),
    ((http_errors.InvalidChunkSize, http_errors.ChunkMissingTerminator, http_errors.InvalidChunkExtension),
     (400, "Bad Request", "invalid_chunked_body", "The chunked request body is malformed.")),
    ((http_errors.UnsupportedTransferCoding,),
     (501, "Not Implemented", "unsupported_transfer_coding", "This Transfer-Encoding is not supported.")),
    ((http_errors.ExpectationFailed,),
     (417, "Expectation Failed", "expectation_failed", "This Expect header cannot be met.")),
    ((http_errors.ForbiddenProxyRequest, SSLError),
     (403, "Forbidden", "forbidden", "This request is refused.")),
    ((http_errors.InvalidProxyLine, http_errors.InvalidSchemeHeaders, http_errors.InvalidH2CPreface),
     (400, "Bad Request", "bad_request", "The request is malformed.")),
)
_INTERNAL = (500, "Internal Server Error", "internal_error", "Internal error.")


def answer_for(exc: BaseException) -> tuple[int, str, str, str]:
    """(status, reason, code, message) for an error gunicorn met while reading or answering a request."""
    if isinstance(exc, (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName,
                        http_errors.ConfigurationProblem)):
        return _INTERNAL  # the application's or the configuration's fault, not the client's
    return next((answer for kinds, answer in _ANSWERS if isinstance(exc, kinds)), _INTERNAL)


def error_page(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying the JSON envelope; the connection is closed after it."""
    body = json.dumps(error_body(status, message, code=code)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nServer: {SERVER_NAME}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode("latin-1") + body


class JsonErrorsWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's threaded worker, answering its own errors in the JSON envelope."""

    def init_process(self) -> None:
        # Read by gunicorn's Response when it writes the status line and headers of each answer.
        gunicorn.http.wsgi.SERVER = SERVER_NAME
        super().init_process()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        status, reason, code, message = answer_for(exc)
        if status == 500:
            self.log.exception("Error handling request (%s)", type(exc).__name__)
        else:
            # The exception's text can hold request bytes (a whole malformed header line): only its kind is logged.
            self.log.warning("Invalid request refused with %s: %s", status, type(exc).__name__)
        try:
            util.write_nonblock(client, error_page(status, reason, code, message))
        except Exception:  # noqa: BLE001 - the client may be gone; nothing more to tell it
            self.log.debug("Failed to send error message.")
