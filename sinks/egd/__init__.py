"""
The EGD sink: the Entropy Gathering Daemon protocol over TCP and Unix sockets.
"""
