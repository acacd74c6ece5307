variable "grafana_admin_password" {
  description = "Password of Grafana's admin user."
  type        = string
  sensitive   = true
}

variable "node_selector" {
  description = "Node labels of the CPU system pool, where the operator, Prometheus and Grafana run."
  type        = map(string)
  default = {
    "expertmesh.io/pool" = "system"
  }
}

variable "scrape_kube_proxy" {
  description = "Scrape kube-proxy; false where there is none (GKE Dataplane V2)."
  type        = bool
  default     = true
}
