#!/bin/sh
# Start a simulated board: on first start make its own host key (kept in its volume); on every
# start publish that key's known_hosts line for pinning, install the controller's public key,
# then run sshd in the foreground. Nothing here ever sees a private key but the board's own.
set -eu

name="${BOARD_NAME:-}"
case "$name" in
  "" | -* | *[!a-z0-9_-]*) echo "board: BOARD_NAME must be the board's compose service name ([a-z0-9_-]), got '$name'" >&2; exit 2 ;;
esac
key=/var/lib/nativelm-board/ssh_host_ed25519_key
controller_pub=/run/nativelm/authorized/controller.pub
pins=/run/nativelm/pins

if [ ! -s "$key" ]; then
  mkdir -p "$(dirname "$key")"
  rm -f "$key.new" "$key.new.pub"
  ssh-keygen -q -t ed25519 -N '' -C "$name" -f "$key.new"
  mv "$key.new.pub" "$key.pub"
  mv "$key.new" "$key"
fi
echo "board $name: host key $(ssh-keygen -lf "$key.pub")"

# the controller connects to `$name` on port 22: that is the known_hosts host field
if [ -d "$pins" ]; then
  printf '%s %s\n' "$name" "$(cut -d' ' -f1,2 "$key.pub")" > "$pins/.$name.tmp"
  mv "$pins/.$name.tmp" "$pins/$name.known_hosts"
fi

if [ ! -s "$controller_pub" ]; then
  echo "board $name: no controller key at $controller_pub (the fleet-keys service makes it)" >&2
  exit 1
fi
install -d -m 755 /etc/ssh/authorized_keys
install -m 644 "$controller_pub" /etc/ssh/authorized_keys/nativelm
mkdir -p /run/sshd
exec /usr/sbin/sshd -D -e
