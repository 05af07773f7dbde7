package main

import (
	"fmt"
	"io"
	"net/http"
	"time"
)

// cmdHealthcheck probes an HTTP URL and exits 0 on a 2xx answer. Container
// healthchecks use it: the rota image has no shell or curl.
func cmdHealthcheck(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("healthcheck", stderr, "rota healthcheck [--url http://127.0.0.1:9090/readyz] [--timeout 2s]")
	url := fs.String("url", "http://127.0.0.1:9090/readyz", "URL that must answer 2xx")
	timeout := fs.Duration("timeout", 2*time.Second, "request timeout")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	c := &http.Client{Timeout: *timeout}
	resp, err := c.Get(*url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("%s: %s", *url, resp.Status)
	}
	return nil
}
