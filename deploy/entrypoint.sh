#!/bin/sh
# Link the image's kernel headers for the running kernel (bcc needs /lib/modules/$(uname -r)/build).
set -e
k=$(uname -r)
if [ ! -e "/lib/modules/$k/build" ]; then
  mkdir -p "/lib/modules/$k"
  ln -sfn "$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n1)" "/lib/modules/$k/build"
  ln -sfn "$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -n1)" "/lib/modules/$k/source"
fi
exec membrane "$@"
