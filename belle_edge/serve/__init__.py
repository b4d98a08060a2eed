"""``belle-edge serve``: an OpenAI-compatible HTTP server and a chat page over the batched engine
(runtime/engine.py). ``app.create_app(engine, model_name=...)`` builds the app; needs the ``serve`` extra."""
