package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"syscall"
	"time"
)

// Client talks to a running agent over its control socket.
type Client struct {
	path string
	hc   *http.Client
}

// NewClient returns a client for the socket at path. It connects lazily, per request.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableKeepAlives: true,
	}
	return &Client{path: path, hc: &http.Client{Transport: tr, Timeout: 15 * time.Second}}
}

// Status fetches the agent's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/v1/status", &st)
	return st, err
}

// Services fetches the agent's service table.
func (c *Client) Services(ctx context.Context) ([]Service, error) {
	var svcs []Service
	err := c.do(ctx, http.MethodGet, "/v1/services", &svcs)
	return svcs, err
}

// Resolve asks the agent's DNS server for name.
func (c *Client) Resolve(ctx context.Context, name, qtype string) (Resolution, error) {
	var res Resolution
	q := url.Values{"name": {name}, "type": {qtype}}
	err := c.do(ctx, http.MethodGet, "/v1/resolve?"+q.Encode(), &res)
	return res, err
}

// WireGuard fetches the agent's WireGuard device state.
func (c *Client) WireGuard(ctx context.Context) (WireGuard, error) {
	var wg WireGuard
	err := c.do(ctx, http.MethodGet, "/v1/wireguard", &wg)
	return wg, err
}

// Ping asks the agent to probe node and calls each with every result as it arrives. The last
// result of a failed run carries the error.
func (c *Client) Ping(ctx context.Context, node string, count int, untilDirect bool, each func(PingResult)) error {
	q := url.Values{"node": {node}, "count": {strconv.Itoa(count)}, "until-direct": {strconv.FormatBool(untilDirect)}}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent/v1/ping?"+q.Encode(), nil)
	if err != nil {
		return err
	}
	hc := *c.hc
	hc.Timeout = 0 // a ping runs as long as the caller's context allows
	resp, err := hc.Do(req)
	if err != nil {
		return c.wrapErr(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return decodeError(resp)
	}
	dec := json.NewDecoder(resp.Body)
	for {
		var res PingResult
		if err := dec.Decode(&res); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("control socket %s: read ping results: %w", c.path, err)
		}
		if res.Seq == 0 && res.Error != "" {
			return fmt.Errorf("agent: %s", res.Error)
		}
		each(res)
	}
}

// Down asks the agent to shut down.
func (c *Client) Down(ctx context.Context) error {
	return c.do(ctx, http.MethodPost, "/v1/down", nil)
}

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, "http://agent"+path, nil)
	if err != nil {
		return err
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return c.wrapErr(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return decodeError(resp)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("control socket %s: read %s: %w", c.path, path, err)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("control socket %s: decode %s: %w", c.path, path, err)
	}
	return nil
}

func (c *Client) wrapErr(err error) error {
	if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("no agent answers on %s (is `meshctl up` running? pass --control-socket if it uses another socket): %w", c.path, err)
	}
	if errors.Is(err, os.ErrPermission) {
		return fmt.Errorf("control socket %s: permission denied (run as root): %w", c.path, err)
	}
	return fmt.Errorf("control socket %s: %w", c.path, err)
}

func decodeError(resp *http.Response) error {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var e struct {
		Error string `json:"error"`
	}
	if json.Unmarshal(body, &e) == nil && e.Error != "" {
		return fmt.Errorf("agent: %s", e.Error)
	}
	return fmt.Errorf("agent: %s %s: %s", resp.Request.Method, resp.Request.URL.Path, resp.Status)
}
