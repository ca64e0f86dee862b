# Membrane node agent image: the DaemonSet of deploy/helm/membrane runs it privileged with hostNetwork,
# hostPID and the bpffs, cgroup and /var/run/membrane host mounts. Build it with `make image`
# (deploy/build-image.sh), which needs no registry: the base is a local Debian rootfs.
#
# Two stages. `build` makes the wheel, a venv with it and its runtime dependencies, the CNI zipapp, and
# unpacks Debian's kernel headers without their package dependencies. The run stage gets only those
# results plus python3, bcc and iproute2: no pip, no wheel cache, no compiler, no apt lists.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# Check-Valid-Until: the Debian mirror here may serve a snapshot whose Release files have expired.
RUN apt-get -o Acquire::Check-Valid-Until=false update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY parsers ./parsers
COPY policies ./policies
COPY proxy ./proxy
COPY bpf ./bpf
COPY control ./control
COPY cli ./cli
COPY sandbox ./sandbox
COPY examples ./examples
# The venv lives at the path it will have in the run stage (its scripts name their interpreter).
RUN python3 -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python3 -m venv /opt/membrane/venv \
 && /opt/membrane/venv/bin/pip install --no-cache-dir /wheels/membrane-*.whl \
 && /opt/membrane/venv/bin/pip uninstall -y -q pip setuptools
# The venv sees Debian's bcc module through a link (the PyPI package named bcc is unrelated).
RUN ln -s /usr/lib/python3/dist-packages/bcc \
      "$(/opt/membrane/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bcc"
# Host-side CNI files and the hook scripts; the zipapp only when the wheel has the membrane-cni entry
# point (make_zipapp exits 3 otherwise, and chaining then fails at install naming the missing file).
COPY deploy/cni/install.py /out/cni_install.py
COPY deploy/cni/launcher.sh /out/launcher.sh
COPY deploy/hooks/node_cleanup.py deploy/hooks/wait_daemonset.py /out/
COPY deploy/cni/make_zipapp.py /tmp/make_zipapp.py
RUN /opt/membrane/venv/bin/python /tmp/make_zipapp.py /out/membrane-cni.pyz; rc=$?; [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ]
# bcc compiles against headers at load time. The headers packages depend on gcc (for building
# modules), which bcc does not use: unpack just the two header packages instead of installing them.
RUN cd /tmp \
 && hdr=$(apt-cache depends linux-headers-amd64 | awk '/Depends: linux-headers-/ {print $2; exit}') \
 && common=$(apt-cache depends "$hdr" | awk '/Depends: linux-headers-.*-common/ {print $2; exit}') \
 && apt-get download "$hdr" "$common" \
 && mkdir /headers && for deb in ./*.deb; do dpkg-deb -x "$deb" /headers; done \
 && rm -rf /headers/usr/share/doc \
 && find /headers/usr/src/linux-headers-*-common/arch -mindepth 1 -maxdepth 1 ! -name x86 -exec rm -rf {} +

FROM ${BASE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get -o Acquire::Check-Valid-Until=false update \
 && apt-get install -y --no-install-recommends python3 python3-bpfcc iproute2 \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log
COPY --from=build /headers/usr/src/ /usr/src/
COPY --from=build /opt/membrane/venv /opt/membrane/venv
COPY --from=build /out/ /usr/local/lib/membrane/
COPY deploy/entrypoint.sh /usr/local/bin/membrane-entrypoint
RUN ln -s /opt/membrane/venv/bin/membrane /usr/local/bin/membrane \
 && if [ -e /opt/membrane/venv/bin/membrane-cni ]; then ln -s /opt/membrane/venv/bin/membrane-cni /usr/local/bin/membrane-cni; fi
# The host's kernel version differs from the image's headers: the entrypoint links them at start.
ENTRYPOINT ["/usr/local/bin/membrane-entrypoint"]
CMD ["run", "--kubernetes"]
