"""gunicorn settings for farmnode-api.service (`gunicorn -c python:farmnode.api.gunicorn_conf`).

The listening sockets come from systemd (LISTEN_FDS): no `bind` here. Threads rather than
processes: requests mostly wait on D-Bus, and an event stream holds one thread.
"""

worker_class = "gthread"
workers = 1
threads = 32
# Event streams would hold a graceful stop for this long; they reconnect (retry: 2000).
graceful_timeout = 5
keepalive = 5
# 8 KiB request line and headers, as gunicorn's defaults; bodies are limited by the app.
limit_request_line = 8190
# gunicorn 27's control socket wants a writable path; the service has none and needs none.
control_socket_disable = True
accesslog = "-"
errorlog = "-"
access_log_format = '%(h)s "%(r)s" %(s)s %(b)s %(M)sms "%(a)s"'
proc_name = "farmnode-api"
