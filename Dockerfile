# A FROM scratch image holding only the static binary.
#   ./build.sh && podman build -t uffd-handler .
# See README, "Containers", for running it.
FROM scratch
COPY build/uffd-handler /uffd-handler
ENTRYPOINT ["/uffd-handler"]
