#!/bin/sh
# Pin the simulated boards' host keys for the controller (run in the worker container).
#   infra/docker/pin-boards.sh          show each published key's fingerprint and what pinning would do
#   infra/docker/pin-boards.sh --yes    append the keys of boards not pinned yet to the known_hosts file
# The keys come from the fleet-pins volume, written by each board container itself (never over the
# network). A board whose pinned key differs from the one it publishes is refused, never replaced:
# remove its line by hand once you know why the key changed.
set -eu
pins="${PINS_DIR:-/run/nativelm/pins}"
known_hosts="${KNOWN_HOSTS:-/run/nativelm/fleet/known_hosts}"
apply=no
case "${1:-}" in
  --yes) apply=yes ;;
  "") ;;
  *) echo "usage: $0 [--yes]" >&2; exit 2 ;;
esac

found=no changed=no
for file in "$pins"/*.known_hosts; do
  [ -e "$file" ] || continue
  found=yes
  read -r host type key < "$file"
  fingerprint="$(ssh-keygen -lf "$file" | cut -d' ' -f2)"
  pinned="$(awk -v h="$host" -v t="$type" '$1 == h && $2 == t { print $3; exit }' "$known_hosts" 2>/dev/null || true)"
  if [ -z "$pinned" ]; then
    echo "$host: $type $fingerprint  -> $( [ "$apply" = yes ] && echo pinned || echo 'not pinned yet (run with --yes to pin)')"
    [ "$apply" = yes ] && printf '%s %s %s\n' "$host" "$type" "$key" >> "$known_hosts"
  elif [ "$pinned" = "$key" ]; then
    echo "$host: $type $fingerprint  -> already pinned"
  else
    echo "$host: publishes $type $fingerprint, which is NOT the key pinned in $known_hosts: refused" >&2
    changed=yes
  fi
done
if [ "$found" = no ]; then
  echo "no board has published a host key in $pins yet (are the board services up?)" >&2
  exit 1
fi
[ "$changed" = no ]
