"""How a sysadmin lives with relayd: control socket, status, queue, test, sendmail, alerts,
metrics (SPEC "Commands", "Files and directories")."""
