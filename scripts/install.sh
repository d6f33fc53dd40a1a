#!/usr/bin/env bash
# scripts/install.sh install|uninstall: what `make install` / `make uninstall` do.
#
#   PREFIX   the venv the package and its native modules go into   (/opt/hived)
#   BINDIR   where the `hived` command links to PREFIX/bin/hived    (/usr/local/bin)
#   CONFDIR  example configs, CONFDIR/*.example                      (/etc/hived)
#   UNITDIR  the systemd units                                       (/etc/systemd/system)
#   PYTHON   the interpreter the venv is made from                   (python3)
#   EXTRAS   pip extras of hived to install too, e.g. "plot"         ("")
#
# Both are idempotent: running install twice gives the same files; uninstall removes only
# what install puts there (never CONFDIR/*.toml, the operator's, nor /var/lib/hived, the
# state). The units name /usr/local/bin/hived and /etc/hived/: rewritten to BINDIR and CONFDIR.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/opt/hived}
BINDIR=${BINDIR:-/usr/local/bin}
CONFDIR=${CONFDIR:-/etc/hived}
UNITDIR=${UNITDIR:-/etc/systemd/system}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
UNITS=(hived-box.service hived-control.service hived-router.service hived-connector.service)
EXAMPLES=(box.toml.example hive.toml.example router.toml.example connector.toml.example)

# systemctl only where systemd runs this machine and the units went to its own directory.
systemd_live() {
    [[ -d /run/systemd/system && "$UNITDIR" == /etc/systemd/system ]] && command -v systemctl >/dev/null
}

install_all() {
    # A venv of its own: Debian's python3 refuses pip installs into the system (PEP 668).
    # Not editable: the checkout can go away afterwards.
    local spec=.
    [[ -n "$EXTRAS" ]] && spec=".[$EXTRAS]"
    scripts/venv.sh "$PYTHON" "$PREFIX" --upgrade "$spec"
    "$PREFIX/bin/python" -c 'import hived.native' >/dev/null   # the native modules import
    install -d -m 0755 "$BINDIR" "$UNITDIR"
    ln -sfn "$PREFIX/bin/hived" "$BINDIR/hived"
    for unit in "${UNITS[@]}"; do
        sed -e "s|/usr/local/bin/hived|$BINDIR/hived|g" -e "s|/etc/hived/|$CONFDIR/|g" "systemd/$unit" >"$UNITDIR/$unit.tmp"
        chmod 0644 "$UNITDIR/$unit.tmp"
        mv "$UNITDIR/$unit.tmp" "$UNITDIR/$unit"
    done
    install -d -m 0755 "$CONFDIR"
    for example in "${EXAMPLES[@]}"; do
        install -m 0644 "systemd/$example" "$CONFDIR/$example"
    done
    if systemd_live; then
        systemctl daemon-reload
    fi
    echo "installed: $PREFIX (venv), $BINDIR/hived, ${UNITS[*]} in $UNITDIR, examples in $CONFDIR"
    echo "next: copy $CONFDIR/<name>.toml.example to $CONFDIR/<name>.toml, edit it, run \`hived doctor\`,"
    echo "      then \`systemctl enable --now hived-box\` (or hived-control, hived-router, hived-connector)"
}

uninstall_all() {
    for unit in "${UNITS[@]}"; do
        [[ -e "$UNITDIR/$unit" ]] || continue
        if systemd_live; then
            systemctl disable --now "$unit" >/dev/null 2>&1 || true
        fi
        rm -f "$UNITDIR/$unit"
    done
    systemd_live && systemctl daemon-reload
    # The command only if it is ours (a link into PREFIX), never someone else's hived.
    if [[ -L "$BINDIR/hived" && "$(readlink "$BINDIR/hived")" == "$PREFIX/bin/hived" ]]; then
        rm -f "$BINDIR/hived"
    fi
    for example in "${EXAMPLES[@]}"; do
        rm -f "$CONFDIR/$example"
    done
    rmdir "$CONFDIR" 2>/dev/null || true   # kept when it holds the operator's configs
    # PREFIX only if it is a venv made by install (pyvenv.cfg + the package), never a
    # directory that happens to be named so.
    if [[ -f "$PREFIX/pyvenv.cfg" && -x "$PREFIX/bin/hived" ]]; then
        rm -rf "$PREFIX"
    fi
    echo "uninstalled (kept: $CONFDIR/*.toml, /var/lib/hived)"
}

case "${1:-}" in
    install) install_all ;;
    uninstall) uninstall_all ;;
    *) echo "usage: scripts/install.sh install|uninstall" >&2; exit 2 ;;
esac
