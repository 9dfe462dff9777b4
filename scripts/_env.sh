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

# The locks are written so that the pip a Python bundles accepts them (scripts/lock keeps
# the dev lock's extras for pip before 24), rather than upgrading pip first: the platform
# installs requirements.txt with a pip we do not choose, so a lock only a newer pip takes
# would pass here and fail there. The tests install both locks with the bundled pip.
ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        "$(pick_python)" -m venv .venv
    fi
    # Reinstall only when a lock or pyproject.toml changed since the last install.
    local stamp=".venv/.installed"
    if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ] ||
        [ requirements.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        echo "Installing into .venv (first run, or a lock changed)..." >&2
        # Which pip did the install: the dev lock then brings .venv's pip to its own pin.
        .venv/bin/python -m pip --version | cut -d' ' -f1,2 >.venv/.installed-with
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

# One line for the log: the Python the tests run on and the pip that installed the locks.
describe_venv() {
    local python installer
    python=$(.venv/bin/python -c 'import platform, sys; print(f"Python {platform.python_version()} ({sys._base_executable})")')
    installer=$(cat .venv/.installed-with 2>/dev/null || echo "an unrecorded pip")
    echo "$python; the locks were installed with $installer; $(.venv/bin/python -m pip --version | cut -d' ' -f1,2) now"
}
