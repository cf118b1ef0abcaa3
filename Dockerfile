# fhir-outreach: one image for `serve` and `worker`.
FROM python:3.12-slim
RUN useradd --create-home --uid 10001 outreach
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .
USER outreach
WORKDIR /home/outreach
ENV FHIR_OUTREACH_HOST=0.0.0.0 \
    FHIR_OUTREACH_PORT=8080 \
    FHIR_OUTREACH_DATA_DIR=/home/outreach/data
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)" || exit 1
ENTRYPOINT ["fhir-outreach"]
CMD ["serve"]
