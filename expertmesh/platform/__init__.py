"""What users touch: the Ray Serve app and its HTTP server (`server/`). It is the only package that imports
`ray.serve`, FastAPI or Starlette; the elastic controller comes with the elastic-experts issue."""
