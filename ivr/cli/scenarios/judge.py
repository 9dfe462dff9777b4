"""Plain-language checks, judged by the configured model.

"The agent asked for the date of the booking" cannot be checked with a
pattern: the judge reads the conversation so far and answers with a JSON
verdict {"pass": true|false, "reason": "..."}.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import openai

# The judge may take longer than a phone turn, and a retry is cheap here.
JUDGE_TIMEOUT_SECONDS = 30.0
JUDGE_RETRIES = 2

RUBRIC = """\
You check one statement about a phone call between a caller and an automated agent.
Rules:
- Judge only the statement, using only the conversation shown; do not grade anything else.
- It passes only if the conversation clearly shows it is true; if unsure, it fails.
- Wording does not matter, meaning does: a paraphrase of what the statement describes counts.
- Lines in [brackets] are events on the line (silence, keys pressed, hang-ups, transfers).
Answer with a JSON object only: {"pass": true or false, "reason": "one short sentence"}."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str


class JudgeError(Exception):
    """The judge gave no usable verdict (unreachable, or not the JSON asked for)."""


class Judge:
    def __init__(self, client: openai.OpenAI, model: str):
        self.client = client
        self.model = model

    @classmethod
    def from_environment(cls) -> Judge:
        """The model the app would use (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL)."""
        from ...config import Settings

        try:
            client = openai.OpenAI(timeout=JUDGE_TIMEOUT_SECONDS, max_retries=JUDGE_RETRIES)
        except openai.OpenAIError as exc:  # no API key
            raise JudgeError(f"no judge model: {exc}") from exc
        return cls(client, os.environ.get("OPENAI_MODEL") or Settings.openai_model)

    @classmethod
    def sharing(cls, client: openai.OpenAI, model: str) -> Judge:
        """A judge on the app's own client (its connections), with the judge's timeouts."""
        return cls(
            client.with_options(timeout=JUDGE_TIMEOUT_SECONDS, max_retries=JUDGE_RETRIES), model
        )

    def close(self) -> None:
        self.client.close()

    def check(self, statement: str, conversation: list[str]) -> Verdict:
        transcript = "\n".join(conversation)
        try:
            completion = self.client.chat.completions.create(
                model=self.model,
                messages=[
                    {"role": "system", "content": RUBRIC},
                    {
                        "role": "user",
                        "content": f"Conversation:\n{transcript}\n\nStatement: {statement}",
                    },
                ],
                response_format={"type": "json_object"},
            )
        except openai.OpenAIError as exc:
            raise JudgeError(f"the judge model {self.model} did not answer: {exc}") from exc
        content = completion.choices[0].message.content if completion.choices else None
        try:
            verdict = json.loads(content or "")
            passed, reason = verdict["pass"], verdict.get("reason", "")
            if not isinstance(passed, bool) or not isinstance(reason, str):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise JudgeError(
                f"the judge model {self.model} did not answer with the JSON verdict asked "
                f"for: {(content or '')[:200]!r}"
            ) from exc
        return Verdict(passed, reason.strip())
