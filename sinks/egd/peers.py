"""
Who is at the other end of an EGD connection, as the socket says.
"""

import socket
import struct

from broker.accounts import Peer

_CREDENTIALS = struct.Struct("3i")
"""``struct ucred``: pid, uid, gid."""


def peer_uid(sock: socket.socket) -> int:
    """
    The uid the kernel vouches for at the other end of a Unix socket
    (SO_PEERCRED).

    Raises:
        OSError: the socket cannot say (not a Unix socket, or closed).
    """
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
    return int(_CREDENTIALS.unpack(creds)[1])


def unix_peer(sock: socket.socket | None) -> Peer:
    """
    A Unix-socket peer, with the uid the kernel vouches for (SO_PEERCRED).
    """
    if sock is None:
        return Peer("unix")
    try:
        return Peer("unix", uid=peer_uid(sock))
    except OSError:
        return Peer("unix")


def peer_text(peer: object) -> str:
    """
    A peer address as logs show it (``[::1]:4711``, ``10.0.0.5:4711``, ``unix``).
    """
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) if peer else "unix"
