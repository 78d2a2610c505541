# Sourced by the launch scripts: where the checkout is and which Python runs it.
#
# The scripts never change directory: CONFIG, WORKDIR and any path in an override
# are taken relative to where you run them, as `python -m mtaclip_jax.main` takes them.
#
# Python: $PYTHON if set, else this checkout's .venv/bin/python if it exists, else
# python3 from PATH. The checkout is put first on PYTHONPATH, so its code runs even
# with an interpreter it is not installed into.

MTACLIP_REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

mtaclip_python() {
  if [ -n "${PYTHON:-}" ]; then
    echo "$PYTHON"
  elif [ -x "$MTACLIP_REPO/.venv/bin/python" ]; then
    echo "$MTACLIP_REPO/.venv/bin/python"
  else
    command -v python3 || echo python3
  fi
}

export PYTHONPATH="$MTACLIP_REPO${PYTHONPATH:+:$PYTHONPATH}"
