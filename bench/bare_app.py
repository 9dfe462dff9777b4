"""The floor for the turn benchmark: a WSGI app that answers a fixed TwiML document."""

BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Response><Gather input="speech">'
    b"<Say>ok</Say></Gather></Response>"
)


def app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "text/xml"), ("Content-Length", str(len(BODY)))])
    return [BODY]
