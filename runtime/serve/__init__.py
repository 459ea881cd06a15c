"""diffrt's HTTP server (the `serve` extra): the OpenAI Images API, a web page, health and metrics over one model
driven by one worker thread (app.py, service.py, worker.py), and its scale-out on Ray Serve (ray_app.py, the `ray`
extra). Nothing is imported here: `import diffrt.serve` needs neither FastAPI nor Ray."""
