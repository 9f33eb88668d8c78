# Shared by webui.sh and run_tests.sh: create .venv/ and (re)install a requirements file when it changed.
ensure_venv() {
  local req="$1" stamp=".venv/.installed-$(basename "$1" .txt)"
  local want
  want=$(cat requirements*.txt | sha256sum | cut -c1-16)
  if [ ! -x .venv/bin/python ]; then
    echo "Creating the Python environment in .venv/ ..."
    python3 -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "Installing $req into .venv/ (pinned versions; takes about a minute) ..."
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
  fi
}
