"""sysinfo: facts about this host for the master — CPUs, RAM, disks, NICs, GPUs (issue [4]).
May import the standard library, psutil and pyroute2 only.
"""
