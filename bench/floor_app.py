"""The turn benchmark's floor: the least any Gather turn on this stack must do.

Issue 24 defines it as a gevent app doing the form, one pipelined Redis round
trip and one LLM call; this is that app, run under the same gunicorn and
worker as the real one. It reads the form (Twilio's words), stores them and
reads the history back in one pipeline, asks the model through the openai SDK
the cheapest way the SDK offers (`client.post`, the reply read as plain JSON,
as ivr/agent/llm.py does), and answers a fixed TwiML document around the
reply. No signature check, no claim, no stored answer, no retries: what the
app does beyond this is its own cost.
"""

from __future__ import annotations

import json
import os
from xml.sax.saxutils import escape

import openai
import redis
from werkzeug.wrappers import Request, Response

_redis = redis.Redis.from_url(os.environ["REDIS_URL"])
_model = openai.OpenAI(
    api_key=os.environ["OPENAI_API_KEY"], base_url=os.environ["OPENAI_BASE_URL"], max_retries=0
)


@Request.application
def app(request: Request) -> Response:
    if request.path == "/healthz":
        return Response("ok")
    sid, words = request.form["CallSid"], request.form.get("SpeechResult", "")
    key = f"ivr:{{{sid}}}:floor"
    with _redis.pipeline(transaction=True) as pipe:
        pipe.rpush(key, json.dumps({"role": "user", "content": words}))
        pipe.lrange(key, -20, -1)
        pipe.expire(key, 3600)
        _, history, _ = pipe.execute()
    reply = _model.post(
        "/chat/completions",
        body={"model": "bench-model", "messages": [json.loads(m) for m in history]},
        cast_to=dict,
    )
    said = escape(reply["choices"][0]["message"]["content"])
    return Response(
        '<?xml version="1.0" encoding="UTF-8"?><Response><Gather input="speech">'
        f"<Say>{said}</Say></Gather></Response>",
        content_type="text/xml",
    )
