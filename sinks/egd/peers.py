"""
Who is at the other end of an EGD connection, as the socket says.
"""

import socket
import struct

from broker.accounts import Peer


def unix_peer(sock: socket.socket | None) -> Peer:
    """
    A Unix-socket peer, with the uid the kernel vouches for (SO_PEERCRED).
    """
    if sock is None:
        return Peer("unix")
    try:
        creds = sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
    except OSError:
        return Peer("unix")
    _pid, uid, _gid = struct.unpack("3i", creds)
    return Peer("unix", uid=uid)


def peer_text(peer: object) -> str:
    """
    A peer address as logs show it (``[::1]:4711``, ``10.0.0.5:4711``, ``unix``).
    """
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unix"
