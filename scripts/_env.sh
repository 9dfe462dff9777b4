# Shared by scripts/*: a project virtualenv installed from the dev lock.
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

# .venv gets exactly the versions in requirements-dev.txt (hash-checked), then
# the project itself, editable. The locked files are downloaded once into
# .venv/wheels, where the deploy test (tests/test_deploy.py) installs
# requirements.txt from too, as the platform would but without the network.
# Offline from .venv/wheels; fails when a locked file is not there yet.
install_locked() {
    .venv/bin/python -m pip install --no-index --find-links .venv/wheels \
        -r requirements-dev.txt &&
        .venv/bin/python -m pip install --no-index --find-links .venv/wheels --no-deps -e .
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        "$(pick_python)" -m venv .venv
    fi
    # Reinstall only when a lock or pyproject.toml changed since the last install.
    local stamp=".venv/.installed"
    if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ] ||
        [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "Installing into .venv (first run, or a lock changed)..." >&2
        # Install chatter goes to a log; it is shown only if the install fails.
        # Download first, every time a lock changed: an offline install can
        # succeed on what .venv already has, and leave .venv/wheels without a
        # package that the deploy test's fresh virtualenv needs.
        if ! { .venv/bin/python -m pip download --quiet --dest .venv/wheels \
            -r requirements-dev.txt && install_locked; } >.venv/install.log 2>&1; then
            cat .venv/install.log >&2
            echo "Installing the package failed (log above)." >&2
            exit 1
        fi
        touch "$stamp"
    fi
}
