"""`tgems serve`: an HTTP service on the depth-queue scheduler (tgems.scheduling).

app.py puts the routes together; hf.py holds the Hugging Face routes and shapes (zero-shot classification),
openai.py the OpenAI ones (embeddings, models), service.py what every route shares (models, errors, rows),
schemas.py the classify request shapes and image decoding, models.py the served classifiers, metrics.py the
Prometheus metrics, static/ the page. Needs the `serve` extra (starlette, uvicorn, prometheus-client,
python-multipart)."""
