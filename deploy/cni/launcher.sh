#!/bin/sh
# membrane-cni launcher, installed in the node's CNI bin dir by the membrane chart's init container.
# The CNI runtime execs plugins on the host, outside every container, so the image's Python is out of
# reach: this runs the plugin's zipapp (membrane-cni.pyz, beside this file; pure Python, standard
# library only) with the host's python3 >= 3.11, passing stdin, the CNI_* environment and arguments
# through unchanged. Without such a python3 it answers with a CNI error result (spec 1.0: code 100 and
# up are the plugin's own) that names the requirement, which the runtime shows on the pod.
# MEMBRANE_CNI_PYTHONS overrides the interpreters tried, in order.
here=$(dirname "$0")
for py in ${MEMBRANE_CNI_PYTHONS:-python3 /usr/bin/python3 /usr/local/bin/python3}; do
  if command -v "$py" >/dev/null 2>&1 \
     && "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
    exec "$py" "$here/membrane-cni.pyz" "$@"
  fi
done
printf '{"cniVersion": "1.0.0", "code": 100, "msg": "membrane-cni needs python3 >= 3.11 on the node", "details": "tried: %s; install python3 on the node or set cni.chaining.enabled=false in the membrane chart"}\n' \
  "${MEMBRANE_CNI_PYTHONS:-python3 /usr/bin/python3 /usr/local/bin/python3}"
exit 1
