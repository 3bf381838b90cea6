# -*- coding: utf-8 -*-
# Runs on the controller: drives `deploy` on a device over the connection
# with plain shell commands (the device needs no Python).
from __future__ import absolute_import, division, print_function
__metaclass__ = type

import json
import shlex
import time

from ansible.errors import AnsibleConnectionFailure, AnsibleError
from ansible.plugins.action import ActionBase

SPEC = dict(
    state=dict(type='str', default='status', choices=['status', 'trial', 'present', 'default', 'good']),
    version=dict(type='str'),
    source=dict(type='str'),
    src=dict(type='path'),
    update=dict(type='bool', default=False),
    index=dict(type='str'),
    disk=dict(type='str'),
    extra_args=dict(type='list', elements='str', default=[]),
    reboot=dict(type='bool', default=True),
    reboot_command=dict(type='str', default='reboot'),
    timeout=dict(type='int', default=600),
    poll=dict(type='int', default=5),
    force=dict(type='bool', default=False),
)


class ActionModule(ActionBase):
    TRANSFERS_FILES = True

    def _sh(self, cmd):
        res = self._low_level_execute_command('PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH; ' + cmd)
        return res.get('rc', 1), res.get('stdout', ''), res.get('stderr', '')

    def _deploy(self, args):
        cmd = 'deploy ' + ' '.join(shlex.quote(a) for a in args)
        rc, out, err = self._sh(cmd)
        if rc != 0:
            raise AnsibleError('%s failed (exit status %s): %s' % (cmd, rc, (err or out).strip()))
        return out

    def _status(self, disk):
        args = ['status'] + ([disk] if disk else []) + ['--json']
        out = self._deploy(args)
        try:
            st = json.loads(out)
        except ValueError:
            raise AnsibleError('deploy status --json printed no JSON: %r' % out[:200])
        if st.get('format') != 1:
            raise AnsibleError('deploy status --json has format %r, this collection reads format 1' % st.get('format'))
        return st

    def _boot_id(self):
        rc, out, dummy = self._sh('cat /proc/sys/kernel/random/boot_id')
        return out.strip() if rc == 0 else None

    def _wait_outcome(self, version, disk, old_boot, timeout, poll):
        end = time.time() + timeout
        last = None
        while time.time() < end:
            time.sleep(poll)
            try:
                self._connection.reset()
                if self._boot_id() in (None, old_boot):
                    continue
                st = self._status(disk)
            except (AnsibleConnectionFailure, AnsibleError) as e:
                last = str(e)
                continue
            trial = st.get('trial')
            lt = st.get('last_trial') or {}
            if trial is None and lt.get('version') == version and lt.get('state') in ('good', 'failed'):
                return st
        raise AnsibleError('%s: no outcome of the trial of %s within %s s (last error: %s)' % (
            self._task.args.get('version'), version, timeout, last))

    def _update(self, version, p, target, disk):
        # `deploy update --trial` picks the newest bundle of the signed index
        # this disk can apply; it must be the version this task rolls out.
        index = ['--index', p['index']] if p['index'] else []
        self._deploy(['update', '--trial'] + index + p['extra_args'] + target)
        armed = (self._status(disk).get('trial') or {}).get('version')
        if armed != version:
            raise AnsibleError('deploy update armed %s, not %s: the index offers this device another version '
                               '(publish %s with deploy bundle index, or give the version the index names)'
                               % (armed or 'nothing', version, version))

    def run(self, tmp=None, task_vars=None):
        result = super(ActionModule, self).run(tmp, task_vars)
        dummy, p = self.validate_argument_spec(argument_spec=SPEC)
        state, version, disk = p['state'], p['version'], p['disk']
        target = [disk] if disk else []
        st = self._status(disk)
        result.update(changed=False, status=st, ansible_facts=dict(btrfs_deploy=st))
        if state == 'status':
            return result
        if state != 'good' and not version:
            raise AnsibleError('state=%s needs version' % state)
        if state == 'good':
            if st.get('running') == st.get('default') and not st.get('trial'):
                return result
            result['changed'] = True
            if not self._play_context.check_mode:
                self._deploy(['mark-good'] + target)
        elif state == 'default':
            if st.get('default') == version:
                return result
            if version not in st.get('versions', []):
                raise AnsibleError('%s is not on the disk (versions: %s)' % (version, ', '.join(st.get('versions', []))))
            result['changed'] = True
            if not self._play_context.check_mode:
                self._deploy(['set-default', version] + target)
        elif state in ('present', 'trial'):
            if st.get('default') == version or (state == 'present' and version in st.get('versions', [])):
                result['outcome'] = 'unchanged'
                return result
            lt = st.get('last_trial') or {}
            if state == 'trial' and lt.get('version') == version and lt.get('state') == 'failed' and not p['force']:
                result.update(failed=True, outcome='failed', failure=lt.get('failure'),
                              msg='the last trial of %s failed on this device (%s); force: true tries it again'
                              % (version, json.dumps(lt.get('failure'))))
                return result
            update = p['update'] or bool(p['index'])
            if update and state != 'trial':
                raise AnsibleError('update (deploy update) goes with state=trial')
            if not p['source'] and not update:
                raise AnsibleError('state=%s needs source (a rootfs, tarball, bundle or URL the device can read) '
                                   'or update: true (the device\'s signed index)' % state)
            result['changed'] = True
            if self._play_context.check_mode:
                return result
            pending = st.get('trial') or {}
            if not (pending.get('version') == version and pending.get('state') == 'armed'):
                if update:
                    self._update(version, p, target, disk)
                else:
                    if p['src']:
                        self._connection.put_file(self._loader.get_real_file(p['src']), p['source'])
                    flag = '--trial' if state == 'trial' else '--no-default'
                    self._deploy(['--version', version, flag, '--rootfs', p['source']] + p['extra_args'] + target)
            if state == 'trial' and p['reboot']:
                old = self._boot_id()
                # A new session, and SIGHUP ignored from before the fork (an
                # ignored signal stays ignored across exec): the reboot
                # outlives the SSH session that asked for it, even when its
                # pty hangs up before setsid runs.
                # (In braces: Ansible appends `&& sleep 0` to the command.)
                rc, out, err = self._sh("trap '' HUP; { setsid sh -c %s </dev/null >/dev/null 2>&1 & }"
                                        % shlex.quote('sleep 1; ' + p['reboot_command']))
                if rc != 0:
                    raise AnsibleError('starting the reboot (%s) failed (exit status %s): %s'
                                       % (p['reboot_command'], rc, (err or out).strip()))
                st = self._wait_outcome(version, disk, old, p['timeout'], p['poll'])
                lt = st['last_trial']
                result.update(status=st, ansible_facts=dict(btrfs_deploy=st), outcome=lt['state'])
                if lt['state'] == 'failed':
                    result.update(failed=True, failure=lt.get('failure'),
                                  msg='the trial of %s failed: %s; the device runs %s again'
                                  % (version, json.dumps(lt.get('failure')), st.get('running')))
        return result
