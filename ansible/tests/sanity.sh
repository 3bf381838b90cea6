#!/bin/sh
# ansible/tests/sanity.sh: ansible-test sanity (offline tests) on this collection.
# Fails on any finding. Needs ansible-core, yamllint, pycodestyle (install-deps.sh test).
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ansible_collections/btrfs_deploy"
cp -a "$here" "$work/ansible_collections/btrfs_deploy/device"
rm -rf "$work/ansible_collections/btrfs_deploy/device/tests/output"
cd "$work/ansible_collections/btrfs_deploy/device"
git init -q . && git add -A
ansible-test sanity --python 3.11 --color no \
    --test action-plugin-docs --test compile --test empty-init \
    --test line-endings --test no-assert --test shebang --test symlinks \
    --test future-import-boilerplate --test metaclass-boilerplate \
    --test no-smart-quotes --test replace-urlopen --test use-compat-six
# The tests that need a venv with pip from the network, run directly:
pycodestyle --max-line-length 160 plugins
yamllint -s -d '{extends: default, rules: {line-length: {max: 250}}}' galaxy.yml meta roles playbooks
ANSIBLE_COLLECTIONS_PATH=$work ansible-doc -t module btrfs_deploy.device.deploy >/dev/null
