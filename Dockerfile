# Membrane node agent image. Runs privileged with hostNetwork, hostPID and /sys/fs/bpf + cgroup mounts
# (see deploy/daemonset.yaml). bcc compiles the programs at start against the headers installed here.
FROM debian:bookworm-slim

ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-pip python3-bpfcc linux-headers-amd64 iproute2 bpftool make ca-certificates \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/membrane
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY parsers ./parsers
COPY policies ./policies
COPY bpf ./bpf
COPY examples ./examples

# The venv sees Debian's bcc module (the PyPI package named bcc is unrelated).
RUN python3 -m venv /opt/membrane/.venv \
 && ln -s /usr/lib/python3/dist-packages/bcc "$(/opt/membrane/.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc" \
 && /opt/membrane/.venv/bin/pip install --no-cache-dir . \
 && ln -s /opt/membrane/.venv/bin/membrane /usr/local/bin/membrane

# The host's kernel version differs from the image's headers: link them at start when missing.
COPY deploy/entrypoint.sh /usr/local/bin/membrane-entrypoint
ENTRYPOINT ["/usr/local/bin/membrane-entrypoint"]
CMD ["run", "--policies", "/etc/membrane/policies", "--endpoints", "/etc/membrane/endpoints.yaml"]
