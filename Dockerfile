# The serving API of an exported run, on CPU.
#
#   python -m research.export --workdir /tmp/quickstart --out model --format onnx
#   docker build -t research-serve .
#   docker run -p 8000:8000 -v $PWD/model:/model -v $PWD/feedback:/feedback research-serve
#
# Serves /model (an --format onnx or stablehlo directory) with onnxruntime or
# JAX; feedback goes to /feedback/feedback.db (mount a volume to keep it).
# A workdir serves too: mount it at /model and set
# `--workdir /model` in place of `--model_dir /model` (the checkpoint's base
# model must then be available: the packaged MiniLM, or a mounted directory).
FROM python:3.11-slim

WORKDIR /app
COPY setup.py README.md ./
COPY research ./research
RUN pip install --no-cache-dir ".[serve]" && mkdir -p /feedback

ENV RAY_USAGE_STATS_ENABLED=0
EXPOSE 8000
ENTRYPOINT ["python", "-m", "research.serve", "--host", "0.0.0.0", \
            "--port", "8000", "--feedback_db", "sqlite:////feedback/feedback.db"]
CMD ["--model_dir", "/model"]
