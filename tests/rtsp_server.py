"""A real RTSP server on loopback for the tests: GStreamer's RTSP server serving a generated test video.

Runs under the system Python (/usr/bin/python3), which has GObject introspection from Debian's python3-gi and
gir1.2-gst-rtsp-server-1.0 (installed by .ci/run). Usage: rtsp_server.py PORT [PATTERN]. Serves
rtsp://127.0.0.1:PORT/test until killed; prints "ready" once it listens.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main() -> None:
    port = sys.argv[1]
    pattern = sys.argv[2] if len(sys.argv) > 2 else "ball"
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    # A moving pattern (never "frozen"), 320x240 at 15 fps, H.264 with a key frame every second so a client
    # that reconnects gets a picture quickly.
    factory.set_launch(
        f"( videotestsrc is-live=true pattern={pattern} ! video/x-raw,width=320,height=240,framerate=15/1 "
        "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! rtph264pay name=pay0 pt=96 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory("/test", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on port {port}")
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
