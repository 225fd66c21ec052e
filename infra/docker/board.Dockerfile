# A simulated edge board of the team stack: Debian with OpenSSH server and Python 3 (+ venv, for
# the runtime's virtualenv), one non-root login `nativelm` that accepts only the controller's key.
# No host key is baked in: each container makes its own on first start (kept in its volume), prints
# its fingerprint and publishes the public half for pinning (docs/team-stack.md).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends openssh-server python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* /etc/ssh/ssh_host_* \
    && useradd --create-home --shell /bin/bash nativelm \
    && usermod -p '*' nativelm
COPY board-sshd.conf /etc/ssh/sshd_config.d/10-nativelm-board.conf
COPY board-entrypoint.sh /usr/local/bin/board-entrypoint
COPY fleet-keys.sh /usr/local/bin/fleet-keys
EXPOSE 22
ENTRYPOINT ["/usr/local/bin/board-entrypoint"]
