#!/bin/sh
# One-shot job of the team stack: the controller's SSH key for the simulated boards (made once,
# kept in the fleet-controller volume, which only the worker mounts), its public half for the
# boards (fleet-authorized volume), and an empty pinned known_hosts that only the pin step fills.
set -eu
controller=/run/nativelm/fleet
authorized=/run/nativelm/authorized

umask 077
if [ ! -s "$controller/id_ed25519" ]; then
  rm -f "$controller/id_ed25519.new" "$controller/id_ed25519.new.pub"
  ssh-keygen -q -t ed25519 -N '' -C nativelm-controller -f "$controller/id_ed25519.new"
  mv "$controller/id_ed25519.new.pub" "$controller/id_ed25519.pub"
  mv "$controller/id_ed25519.new" "$controller/id_ed25519"
fi
[ -e "$controller/known_hosts" ] || : > "$controller/known_hosts"
umask 022
cp "$controller/id_ed25519.pub" "$authorized/.controller.pub.tmp"
mv "$authorized/.controller.pub.tmp" "$authorized/controller.pub"
echo "fleet-keys: controller key $(ssh-keygen -lf "$controller/id_ed25519.pub")"
