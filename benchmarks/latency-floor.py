"""The latency benchmark's floor: the least a Python daemon built like certrelay does.

Usage: latency-floor.py QUEUE UNIT. Waits on inotify (pyinotify, as certrelay does),
and for each file renamed or written into QUEUE runs `systemctl reload UNIT` as
certrelay runs a command (subprocess, output captured, own session, a timeout), then
removes the file. Nothing is claimed, read, checked, matched or recorded.
"""

import os
import subprocess
import sys
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # pyinotify imports asyncore
    import pyinotify


def main(queue, unit):
    def arrived(event):
        subprocess.run(["systemctl", "reload", unit], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, start_new_session=True, timeout=120, check=False)
        os.unlink(event.pathname)

    manager = pyinotify.WatchManager()
    manager.add_watch(queue, pyinotify.IN_MOVED_TO | pyinotify.IN_CLOSE_WRITE)
    notifier = pyinotify.Notifier(manager, default_proc_fun=arrived)
    print(f"watching {queue}", file=sys.stderr, flush=True)  # bench_latency.py waits for this line
    notifier.loop()


if __name__ == "__main__":
    main(*sys.argv[1:])
