# Verdict's one image: api, worker and beat all run from it (docker-compose.yml picks the command).
# Health checks live in docker-compose.yml, not here.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 verdict

WORKDIR /srv/verdict

# The package first (it changes less often than the migrations), then what `verdict migrate` reads at run time.
COPY pyproject.toml README.md ./
COPY app/ app/
COPY workers/ workers/
RUN pip install --no-cache-dir .

COPY migrations/ migrations/
COPY alembic.ini ./

# VAR_DIR (./var) must be writable by the non-root user if the image is ever run on the embedded default.
RUN mkdir var && chown verdict:verdict var

USER verdict
EXPOSE 8000
CMD ["verdict", "api"]
