#!/usr/bin/env bash
# Mount a folder of a Cloud Storage bucket with Cloud Storage FUSE on a TPU VM worker, installing gcsfuse first when
# the image lacks it (the tpu-ubuntu2204-base and v2-alpha images ship none). vit_jax reads datasets through local
# paths (launch/README.md says why). A second run on a mounted point does nothing.
#
#   launch/mount_bucket.sh BUCKET FOLDER MOUNTPOINT      e.g. launch/mount_bucket.sh my-bucket tfds ~/tfds
#
# tpu_vm.sh runs it on every worker, in the checkout: --setup 'launch/mount_bucket.sh my-bucket tfds ~/tfds'.
set -euo pipefail

fail() { echo "error: $*" >&2; exit 2; }
[[ $# -eq 3 ]] || fail "usage: launch/mount_bucket.sh BUCKET FOLDER MOUNTPOINT, e.g. my-bucket tfds ~/tfds"
bucket="${1#gs://}"
bucket="${bucket%/}"
folder="$2"
target="$3"
[[ -n "$bucket" && "$bucket" != */* ]] ||
  fail "BUCKET='$1' is invalid: expected a bucket name such as my-bucket (the folder in it is the second argument)"
[[ -n "$folder" ]] || fail "FOLDER is empty: expected the folder of the bucket to mount, e.g. tfds"

mkdir -p "$target"
if mountpoint -q "$target"; then
  echo "$target is mounted already"
  exit 0
fi
if ! command -v gcsfuse >/dev/null; then
  # https://cloud.google.com/storage/docs/cloud-storage-fuse/install (Debian and Ubuntu)
  echo "installing gcsfuse"
  codename="$(lsb_release -c -s)"
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$codename main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -qq
  sudo apt-get install -y -qq fuse gcsfuse
fi
gcsfuse --implicit-dirs --only-dir "$folder" "$bucket" "$target"
echo "mounted gs://$bucket/$folder at $target"
