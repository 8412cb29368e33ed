"""`tgems serve`: an HTTP service on the depth-queue scheduler (tgems.scheduling).

app.py holds the routes, schemas.py the request shapes (Hugging Face zero-shot image classification,
OpenAI embeddings), models.py the served classifiers, metrics.py the Prometheus metrics, static/ the page.
Needs the `serve` extra (starlette, uvicorn, prometheus-client, python-multipart)."""
