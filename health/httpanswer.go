package health

// An http check's request and the judging of its answer, shared by the
// goroutine path (which reads the answer from a net.Conn) and the prober's
// loop (which judges what has arrived so far, as it arrives).

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// request is the http check's request to a target whose check address is
// addr (the Host header, unless host: is set).
func (s *spec) request(addr string) string {
	host := s.cfg.Host
	if host == "" {
		host = addr
	}
	return "GET " + s.cfg.Path + " HTTP/1.1\r\nHost: " + host + "\r\nUser-Agent: rota-health-check\r\n\r\n"
}

// httpErr says which check's request failed, and how.
func (s *spec) httpErr(how error) error {
	return fmt.Errorf("%s check: GET %s: %w", s.cfg.Check, s.cfg.Path, how)
}

// statusErr is why an answer's status fails the check (nil: it passes).
func (s *spec) statusErr(code int) error {
	if s.wantStatus(code) {
		return nil
	}
	return answeredf("%s check: GET %s: status %d (want %s)", s.cfg.Check, s.cfg.Path, code, strings.Join(statusText(s.cfg.ExpectStatus), ", "))
}

// bodyErr is why an answer's body (its first maxAnswer bytes) fails the
// check's expect_body (nil: it passes).
func (s *spec) bodyErr(body []byte) error {
	if s.cfg.ExpectBody == "" || bytes.Contains(body[:min(len(body), maxAnswer)], []byte(s.cfg.ExpectBody)) {
		return nil
	}
	return answeredf("%s check: GET %s: body lacked %q (got %q)", s.cfg.Check, s.cfg.Path, s.cfg.ExpectBody, excerpt(body))
}

var endOfHeader = []byte("\r\n\r\n")

// maxInterim bounds the interim (1xx) answers skipped before an answer's
// final one, as net/http's client bounds them (5).
const maxInterim = 5

// answerReader is what httpAnswer parses through; its owner (the prober's
// loop) reuses it for every answer.
type answerReader struct {
	rd bytes.Reader
	br *bufio.Reader
}

// httpAnswer judges got, what an http check's request has received so far
// on a connection; eof says the server closed it (got is all there is).
// done is false while the answer is incomplete: its header, a body of
// Content-Length or chunks, or a body that ends when the server closes.
// keep says the connection is at the next answer's start and may serve
// the target's next probe.
func (s *spec) httpAnswer(got []byte, eof bool, ar *answerReader) (done, keep bool, err error) {
	ar.rd.Reset(got)
	if ar.br == nil {
		ar.br = bufio.NewReaderSize(&ar.rd, 4096)
	}
	ar.br.Reset(&ar.rd)
	var resp *http.Response
	for interim := 0; ; interim++ {
		// The answer's header (the first, or the one after an interim
		// answer) is parsed once it is whole, or all there is.
		if rest := got[len(got)-ar.rd.Len()-ar.br.Buffered():]; !eof && len(got) < maxHeader && !bytes.Contains(rest, endOfHeader) {
			return false, false, nil // the header is on its way
		}
		resp, err = http.ReadResponse(ar.br, nil)
		if err != nil {
			return true, false, s.httpErr(err)
		}
		// An interim answer (100 Continue, 103 Early Hints) comes before
		// the one to judge, as net/http's client skips it; 101 is final.
		if resp.StatusCode < 100 || resp.StatusCode > 199 || resp.StatusCode == http.StatusSwitchingProtocols {
			break
		}
		if interim == maxInterim {
			return true, false, s.httpErr(fmt.Errorf("more than %d interim (1xx) answers", maxInterim))
		}
	}
	defer resp.Body.Close()
	if err := s.statusErr(resp.StatusCode); err != nil {
		return true, false, err
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxAnswer+1))
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF) && !eof:
		return false, false, nil // the rest of the body is on its way
	case err != nil:
		return true, false, s.httpErr(fmt.Errorf("reading the body: %w", err))
	case resp.ContentLength < 0 && len(resp.TransferEncoding) == 0 && !eof && len(body) <= maxAnswer:
		return false, false, nil // the body ends when the server closes
	}
	if err := s.bodyErr(body); err != nil {
		return true, false, err
	}
	return true, !resp.Close && len(body) <= maxAnswer && ar.br.Buffered() == 0 && ar.rd.Len() == 0, nil
}
