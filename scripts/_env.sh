# Shared by scripts/*: a project virtualenv with the package installed.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "Python 3.11 or newer is required (set PYTHON=/path/to/python3.11)." >&2
    exit 1
}

ensure_venv() {
    local extras="$1"
    if [ ! -x .venv/bin/python ]; then
        "$(pick_python)" -m venv .venv
    fi
    # Reinstall only when the dependency list changed since the last install.
    local stamp=".venv/.installed-$extras"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "Installing into .venv (first run, or pyproject.toml changed)..." >&2
        # Build chatter goes to a log; it is shown only if the install fails.
        if ! { .venv/bin/python -m pip install --upgrade pip &&
            .venv/bin/python -m pip install -e ".[$extras]"; } >.venv/install.log 2>&1; then
            cat .venv/install.log >&2
            echo "Installing the package failed (log above)." >&2
            exit 1
        fi
        touch "$stamp"
    fi
}
