#!/bin/sh
# make setup's virtualenv: usable as it is, or (re)made, or one line saying what to do.
#   sh mk/venv.sh VENV PYTHON [CHECKOUT STAMP]
# A venv is usable when its Python runs, is 3.10 or newer and has a working pip (a Ctrl-C in the first seconds of
# setup leaves bin/python without pip, a kill during the pip upgrade half a pip) and, with CHECKOUT, when STAMP (its
# first line: the checkout it was set up for, before a "|") names this checkout: a moved or copied venv runs the old
# folder's code through its absolute paths. A venv this script made (its marker file) is made again; any other folder is
# never removed: the user is told why it cannot be used.
set -eu
venv=$1 python=$2 checkout=${3:-} stamp=${4:-}
marker="$venv/.made-by-make-setup"

new_enough() {  # the Python interpreter $1 runs and is 3.10 or newer
	"$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1
}

why=""
if [ ! -e "$venv" ]; then
	why="new"
elif ! new_enough "$venv/bin/python"; then
	why="its Python is missing or older than 3.10"
elif ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
	why="its pip is missing or half installed (an interrupted setup)"
elif [ -n "$checkout" ] && [ -s "$stamp" ]; then
	recorded=$(head -n 1 "$stamp" | cut -d '|' -f 1)  # the Makefile's STAMP_TEXT: CHECKOUT|EXTRAS
	[ "$recorded" = "$checkout" ] || why="it was set up for $recorded (a moved or copied checkout)"
fi
[ -z "$why" ] && exit 0

if [ -e "$venv" ] && [ ! -e "$marker" ]; then
	echo "$venv cannot be used: $why; make setup did not mark it as its own, so it is left alone: remove it" \
		"(rm -rf '$venv') or set VENV=another folder, and run make setup again" >&2
	exit 1
fi
if ! new_enough "$python"; then
	echo "cirlab needs Python 3.10 or newer; '$python' is not (make setup PYTHON=python3.11)" >&2
	exit 1
fi
[ "$why" = "new" ] || { echo "making $venv again: $why" >&2; rm -rf "$venv"; }
mkdir -p "$venv"
touch "$marker"  # first: a venv interrupted half-made is still known as ours
"$python" -m venv "$venv"
