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
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("no agent answers on %s (is `meshctl up` running? pass --control-socket if it uses another socket): %w", c.path, err)
		}
		if errors.Is(err, os.ErrPermission) {
			return fmt.Errorf("control socket %s: permission denied (run as root): %w", c.path, err)
		}
		return fmt.Errorf("control socket %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("control socket %s: read %s: %w", c.path, path, err)
	}
	if resp.StatusCode/100 != 2 {
		var e struct {
			Error string `json:"error"`
		}
		if json.Unmarshal(body, &e) == nil && e.Error != "" {
			return fmt.Errorf("agent: %s", e.Error)
		}
		return fmt.Errorf("agent: %s %s: %s", method, path, resp.Status)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("control socket %s: decode %s: %w", c.path, path, err)
	}
	return nil
}
