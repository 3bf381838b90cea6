#!/usr/bin/python
# -*- coding: utf-8 -*-
# Documentation only: the work is done by the action plugin of the same name.
from __future__ import absolute_import, division, print_function
__metaclass__ = type

DOCUMENTATION = r'''
module: deploy
short_description: Drive btrfs-deploy on a device (status, trial, set-default, mark-good)
description:
  - Runs C(deploy) on the device over the connection with shell commands only
    (an action plugin, so the device needs no Python) and returns
    C(deploy status --json) as the fact C(btrfs_deploy).
  - Idempotent (a version that is already the default is left alone) and
    supports check mode.
options:
  state:
    description:
      - C(status) reads only.
      - C(trial) arms a trial of I(version) from I(source), reboots and waits for its outcome.
      - C(present) adds I(version) without making it the default.
      - C(default) runs C(set-default); C(good) runs C(mark-good).
    type: str
    default: status
    choices: [status, trial, present, default, good]
  version:
    description: The version's label.
    type: str
  source:
    description: What C(deploy --rootfs) reads on the device (a tree, tarball, bundle or URL).
    type: str
  src:
    description: A file on the controller copied to I(source) on the device first.
    type: path
  update:
    description:
      - With C(trial), run C(deploy update --trial) instead of C(deploy --rootfs SOURCE) - the device fetches
        the newest bundle it can apply from the signed index (C(update_url) and C(verify_key) in its
        C(/etc/btrfs-deploy/deploy.toml)); the task fails if that is not I(version).
    type: bool
    default: false
  index:
    description: The index URL for C(deploy update --index) (implies I(update)).
    type: str
  disk:
    description: The disk (default the running system's).
    type: str
  extra_args:
    description: More C(deploy) arguments.
    type: list
    elements: str
    default: []
  reboot:
    description: With C(trial), reboot and wait for the trial's outcome.
    type: bool
    default: true
  reboot_command:
    description: How the device is rebooted (in a new session, so it outlives the connection).
    type: str
    default: reboot
  timeout:
    description: Seconds to wait for the trial's outcome.
    type: int
    default: 600
  poll:
    description: Seconds between checks.
    type: int
    default: 5
  force:
    description: Try a version whose last trial failed on this device again.
    type: bool
    default: false
author: btrfs-deploy developers
'''

EXAMPLES = r'''
- name: Try v2 on the device and wait for the outcome
  btrfs_deploy.device.deploy:
    state: trial
    version: v2
    src: build/v2.tar
    source: /srv/v2.tar

- name: Roll v3 out from the vendor's signed index (update_url on the device)
  btrfs_deploy.device.deploy:
    state: trial
    version: v3
    update: true
'''

RETURN = r'''
status:
  description: C(deploy status --json) after the task.
  returned: always
  type: dict
outcome:
  description: C(good), C(failed) or C(unchanged), for C(trial).
  returned: when state is trial
  type: str
'''
