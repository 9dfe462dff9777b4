"""Settings from a `.env` file in the working directory, under the environment's.

The file is parsed as a dotenv file (python-dotenv), never run by a shell, so a
value such as `SPEECH_HINTS=opening hours, table booking` needs no quotes. A
variable already in the environment wins: `PORT=9000 scripts/run` means 9000
whatever `.env` says.
"""

from __future__ import annotations

from pathlib import Path

from dotenv import load_dotenv


def load_env_file(path: Path | str = ".env") -> bool:
    """Add the file's settings to os.environ where unset; False if there is no file."""
    path = Path(path)
    if not path.is_file():
        return False
    return load_dotenv(path, override=False)
