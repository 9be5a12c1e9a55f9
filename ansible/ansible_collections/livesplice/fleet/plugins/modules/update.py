#!/usr/bin/python
# livesplice.fleet.update: make a livesplice update applied, installed or absent on a host.
# GPL-2.0-only

from __future__ import annotations

DOCUMENTATION = r"""
module: update
short_description: Make a livesplice kernel update applied, installed or absent
description:
  - Runs the host's C(livesplice) command line (its C(--json) output and exit statuses).
  - Idempotent; in check mode it says what it would do and changes nothing (an apply is checked
    with C(apply --dry-run), which makes every check apply makes).
  - A package for another kernel than the running one is skipped for C(applied) (never applied
    to the wrong kernel; the result has C(wrong_kernel=true)); for C(installed) it is kept and
    waits for its kernel.
  - Fails with livesplice's reason (C(msg), C(reasons), C(status)) when livesplice refuses or
    fails; exit status 4 (nothing to do) is success without change.
options:
  package:
    description: The update package on the host (needed for C(applied) and C(installed)).
    type: path
  id:
    description: The update's id (for C(absent); else read from the package).
    type: str
  state:
    description:
      - C(applied) switched now (not kept across a reboot); C(installed) kept for its kernel
        release, applied at every boot, and applied now if that kernel runs; C(absent) undone
        and no longer installed.
    type: str
    choices: [applied, installed, absent]
    default: applied
  other_kernel:
    description:
      - For C(installed), what to do with a package for another kernel than the running one,
        C(keep) it (it waits for that kernel) or C(skip) the host as C(applied) does (a
        rollout skips hosts that run another kernel).
    type: str
    choices: [keep, skip]
    default: keep
  livesplice:
    description: The livesplice command on the host.
    type: path
    default: /opt/livesplice/bin/livesplice
  retries:
    description: Tries before giving up when the code is in use (apply and undo's C(--retries)).
    type: int
    default: 5
"""

RETURN = r"""
id:
  description: the update's id
  type: str
  returned: always
applied:
  description: ids of the updates applied on the host after the task, oldest first
  type: list
  returned: always
installed:
  description: ids of the updates installed for the running kernel
  type: list
  returned: always
pause_ms:
  description: how long the machine was stopped by the apply or undo this task made
  type: float
  returned: when it made one
wrong_kernel:
  description: the package is for another kernel than the running one
  type: bool
  returned: always
release:
  description: the kernel release the package is for
  type: str
  returned: with a package
running_release:
  description: the host's running kernel release
  type: str
  returned: always
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule


class Livesplice:
    def __init__(self, module: AnsibleModule):
        self.module = module
        self.command = module.params["livesplice"]

    def run(self, *args: str, ok=(0,)):
        rc, out, err = self.module.run_command([self.command, *args, "--json"])
        try:
            data = json.loads(out) if out.strip() else {}
        except ValueError:
            data = {}
        if rc not in ok:
            error = data if isinstance(data, dict) else {}
            self.module.fail_json(msg=f"livesplice {args[0]}: {error.get('error') or err.strip() or out}",
                                  status=rc, reasons=error.get("reasons", []), stderr=err)
        return rc, data

    def applied(self) -> list[str]:
        return [u["id"] for u in self.run("list")[1]]

    def installed(self, release: str) -> list[dict]:
        return [i for i in self.run("list", "--installed")[1] if i["release"] == release]


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(package=dict(type="path"), id=dict(type="str"),
                           state=dict(type="str", default="applied",
                                      choices=["applied", "installed", "absent"]),
                           other_kernel=dict(type="str", default="keep", choices=["keep", "skip"]),
                           livesplice=dict(type="path", default="/opt/livesplice/bin/livesplice"),
                           retries=dict(type="int", default=5)),
        required_if=[("state", "applied", ["package"]), ("state", "installed", ["package"]),
                     ("state", "absent", ["package", "id"], True)],
        supports_check_mode=True)
    p = module.params
    if not os.path.exists(p["livesplice"]):
        module.fail_json(msg=f"livesplice is not installed on this host ({p['livesplice']}): "
                             "the livesplice.fleet.setup role installs it")
    ls = Livesplice(module)
    running = os.uname().release
    result = {"changed": False, "wrong_kernel": False, "running_release": running}
    retries = str(p["retries"])

    update_id, release = p["id"], None
    if p["package"]:
        if not os.path.isfile(p["package"]):
            module.fail_json(msg=f"package {p['package']} not found on the host", status=2)
        view = ls.run("view", p["package"])[1]
        update_id, release = view["id"], view["target"]["release"]
        result["release"] = release
        result["wrong_kernel"] = release != running
    result["id"] = update_id
    applied = ls.applied()
    installed = [i["id"] for i in ls.installed(running)]

    def finish(**extra):
        result.update(extra)
        if not module.check_mode:
            result["applied"] = ls.applied()
            result["installed"] = [i["id"] for i in ls.installed(running)]
        else:
            result.setdefault("applied", applied)
            result.setdefault("installed", installed)
        module.exit_json(**result)

    state = p["state"]
    if state == "applied" or (state == "installed" and p["other_kernel"] == "skip"):
        if result["wrong_kernel"]:
            finish(skipped=True, msg=f"the package is for {release}; this host runs {running}")
    if state == "applied":
        if result["wrong_kernel"]:
            finish(skipped=True, msg=f"the package is for {release}; this host runs {running}")
        if update_id in applied:
            finish(msg=f"{update_id} is applied")
        if module.check_mode:
            ls.run("apply", "--dry-run", p["package"])  # fails as apply would
            finish(changed=True, msg=f"would apply {update_id}")
        rc, out = ls.run("apply", "--retries", retries, p["package"])
        finish(changed=True, pause_ms=out["pause_ns"] / 1e6, msg=f"applied {update_id}")

    if state == "installed":
        kept = [i for i in ls.installed(release) if i["id"] == update_id]
        here = release == running
        if kept and (not here or update_id in applied):
            finish(msg=f"{update_id} is installed" + (" and applied" if here else ""))
        if module.check_mode:
            if here and update_id not in applied:
                ls.run("apply", "--dry-run", p["package"])
            finish(changed=True, msg=f"would install {update_id}")
        if kept:  # installed, its kernel runs, not applied (it failed at boot, or was undone)
            rc, out = ls.run("apply", "--retries", retries, p["package"])
            finish(changed=True, pause_ms=out["pause_ns"] / 1e6, msg=f"applied {update_id}")
        rc, out = ls.run("install", "--retries", retries, p["package"], ok=(0, 4))
        extra = {"pause_ms": out["apply"]["pause_ns"] / 1e6} if out.get("apply") else {}
        finish(changed=rc == 0, msg=f"installed {update_id} ({out.get('state', 'kept')})", **extra)

    # absent
    everywhere = [i for i in ls.run("list", "--installed")[1] if i["id"] == update_id]
    if update_id not in applied and not everywhere:
        finish(msg=f"{update_id} is neither applied nor installed")
    if module.check_mode:
        finish(changed=True, msg=f"would undo and uninstall {update_id}")
    extra = {}
    if everywhere:
        rc, out = ls.run("uninstall", "--retries", retries, update_id)
        if out.get("undo"):
            extra["pause_ms"] = out["undo"]["pause_ns"] / 1e6
    else:
        rc, out = ls.run("undo", "--retries", retries, update_id)
        extra["pause_ms"] = out["pause_ns"] / 1e6
    finish(changed=True, msg=f"removed {update_id}", **extra)


if __name__ == "__main__":
    main()
