"""The ``sbmoe`` command: flags generated from the config dataclasses, one verb per job, each building
configs and calling one library function.

Only this package parses arguments or prints for the user; problems a user can fix end in one line and
exit code 2.
"""
