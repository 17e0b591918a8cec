"""Lazy hydration ("instant stage"): a volume is usable on a node before its chunks are local.

- state.py    which chunks are local / written here, persisted atomically (resume after restart)
- fetch.py    one chunk from the object store: retries up to a deadline, BLAKE3-verified
- volume.py   the read/write logic: a read of a missing chunk fetches it first, a write fills it
              first; a background hydrator fetches the rest, chunks near recent reads first
- server.py   the serving process (FUSE file of the volume, a control socket); outlives the plugin
- manager.py  the node plugin's side: start / adopt / stop servers, loop devices on their files
"""
